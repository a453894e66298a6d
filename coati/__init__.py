"""coati: reward-model training for RLHF."""

import logging as _logging

# bitsandbytes (imported by peft and transformers whenever it is installed) warns at import, on CPUs with AVX512-BF16,
# that the optional Hub kernel package ``kernels`` is missing, and then uses its own CPU kernels: nothing a coati run
# can act on, so only its errors are shown.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
