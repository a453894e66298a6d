"""Rendering and truncation: the prompt loses its start first, the reward token is always last."""

import pytest

from coati.data.template import SequenceEncoder, render_prompt, use_chat_template


class _Tok:
    """Whitespace tokenizer: token id = int(word)."""

    eos_token_id, bos_token_id, chat_template = 2, None, None

    def __call__(self, text, add_special_tokens=True):
        class R:
            input_ids = [int(w) for w in text.split()]
        return R()


def test_fits_untouched():
    enc = SequenceEncoder(_Tok(), max_len=10)
    out = enc.encode("10 11 12", "20 21")
    assert out.input_ids == [10, 11, 12, 20, 21, 2]
    assert not out.prompt_truncated and not out.answer_truncated


def test_prompt_cut_from_left_answer_and_eos_kept():
    enc = SequenceEncoder(_Tok(), max_len=8)
    out = enc.encode(" ".join(str(i) for i in range(10, 20)), "30 31 32")
    assert out.input_ids == [16, 17, 18, 19, 30, 31, 32, 2]
    assert out.prompt_truncated and not out.answer_truncated


def test_long_answer_cut_at_end_keeping_prompt_tail_and_eos():
    enc = SequenceEncoder(_Tok(), max_len=8, min_prompt_tokens=2)
    out = enc.encode("10 11 12 13", " ".join(str(i) for i in range(30, 50)))
    assert out.input_ids == [12, 13, 30, 31, 32, 33, 34, 2]
    assert out.prompt_truncated and out.answer_truncated
    assert len(out.input_ids) == 8


def test_reward_token_override():
    enc = SequenceEncoder(_Tok(), max_len=4, reward_token_id=99)
    assert enc.encode("", "1 2 3 4 5").input_ids == [1, 2, 3, 99]


def test_plain_layout_is_hh_rlhf():
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "How?"}]
    assert render_prompt(msgs, None, False) == "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How?\n\nAssistant: "


def test_chat_template_modes(tokenizer):
    assert use_chat_template(tokenizer, "auto") is True
    assert use_chat_template(tokenizer, "never") is False
    with pytest.raises(ValueError, match="no chat template"):
        use_chat_template(_Tok(), "always")
    text = render_prompt([{"role": "user", "content": "你好"}], tokenizer, True)
    assert text.endswith("<|im_start|>assistant\n") and "你好" in text


def test_reward_token_survives_truncation_of_prompt_and_answer():
    enc = SequenceEncoder(_Tok(), max_len=6, reward_token_id=92527, min_prompt_tokens=1)
    long_prompt = " ".join(str(i) for i in range(100, 120))
    out = enc.encode(long_prompt, "7 8 9")  # prompt cut from the left
    assert out.input_ids == [118, 119, 7, 8, 9, 92527] and out.prompt_truncated
    out = enc.encode(long_prompt, " ".join(str(i) for i in range(10, 30)))  # answer alone too long
    assert out.input_ids == [119, 10, 11, 12, 13, 92527] and out.answer_truncated
    assert _Tok.eos_token_id not in out.input_ids


def test_reward_token_id_is_checked_against_vocabulary(tokenizer):
    from coati.models.loading import resolve_reward_token

    assert resolve_reward_token(tokenizer, "auto") == resolve_reward_token(tokenizer, "eos") == tokenizer.eos_token_id
    assert resolve_reward_token(tokenizer, "5") == 5
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        resolve_reward_token(tokenizer, str(len(tokenizer)))


def test_tokenizer_without_eos_needs_an_explicit_reward_token(tokenizer):
    import copy

    from coati.models.loading import prepare_tokenizer, resolve_reward_token

    tok = copy.deepcopy(tokenizer)
    tok.eos_token = None
    assert tok.eos_token_id is None
    with pytest.raises(ValueError, match="has no EOS token.*--reward_token ID"):
        resolve_reward_token(tok, "auto")
    rid = resolve_reward_token(tok, "5")
    prepare_tokenizer(tok, rid)
    assert tok.pad_token_id is not None and tok.pad_token_id != 5
    assert SequenceEncoder(tok, 16, rid).encode("Hi", "there").input_ids[-1] == 5


# -------------------------------------------------------------------- chat templates a model folder brings along

#: two nested loops of range(99999): each range is inside jinja's own limit (MAX_RANGE 100,000), 1e10 iterations
SLOW_TEMPLATE = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}x"


@pytest.mark.parametrize("template, message", [
    (SLOW_TEMPLATE, "took longer than 0.5 s to render a conversation of 1 messages; refused"),
    ("{{ ''.__class__.__mro__ }}", "failed: SecurityError: access to attribute '__class__' of 'str' object is unsafe"),
    ("{{ raise_exception('no system messages') }}", "failed: TemplateError: no system messages"),
    ("{% for m in messages %}{{ m.content / 2 }}{% endfor %}", "failed: TypeError: unsupported operand"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed too deeply"),
])
def test_a_hostile_or_broken_chat_template_fails_in_one_line_in_bounded_time(tokenizer, template, message):
    import copy
    import time

    from coati.data.template import ChatTemplateError, apply_template

    tok = copy.copy(tokenizer)
    tok.chat_template = template
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError) as info:
        apply_template(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True, seconds=0.5)
    assert time.monotonic() - t0 < 10
    text = str(info.value)
    assert text.startswith(f"the chat template of {tokenizer.name_or_path} ") and message in text, text
    assert "\n" not in text


def test_the_bounded_render_equals_transformers_render(tokenizer):
    from coati.data.template import apply_template

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]
    for generation in (True, False):
        assert apply_template(tokenizer, msgs, generation) == \
            tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)
    assert render_prompt(msgs, tokenizer, True) == apply_template(tokenizer, msgs, True)
