"""Print the flag tables of docs/training.md from the config groups (paste them under '## Flags' there after adding
a flag; tests/test_preflight.py and tests/test_registry.py read them)."""

from coati.cli.train import build_parser
from coati.config import ALIASES, GROUPS, option_fields


def main() -> None:
    # the action spelled --<dest> (a boolean's --no_<dest> shares its dest with the opposite default)
    actions = {a.dest: a for a in build_parser()._actions if f"--{a.dest}" in a.option_strings}
    fields = option_fields()
    aliases = {target: name for name, (target, _) in ALIASES.items()}
    for group, cls in GROUPS.items():
        print(f"**{group}** ({cls.__name__}: {cls.__doc__.strip().rstrip('.')})\n")
        print("| flag | default | meaning |\n|---|---|---|")
        for name, (g, f) in fields.items():
            if g != group:
                continue
            action = actions[name]
            default = " ".join(action.default) if isinstance(action.default, list) else action.default
            choices = f" ({' / '.join(map(str, action.choices))})" if action.choices else ""
            alias = f" (old spelling: `--{aliases[name]}`)" if name in aliases else ""
            print(f"| `--{name}` | `{default}` | {f.metadata['help']}{choices}{alias} |")
        print()
    print(f"| `--config` | | {actions['config'].help} |")


if __name__ == "__main__":
    main()
