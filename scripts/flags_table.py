"""Print the README's flag table from TrainConfig (paste it under '## Flags' after adding a flag)."""

import dataclasses

from coati.config import TrainConfig, build_parser


def main() -> None:
    actions = {a.dest: a for a in build_parser()._actions}
    print("| flag | default | meaning |\n|---|---|---|")
    for f in dataclasses.fields(TrainConfig):
        action = actions[f.name]
        default = " ".join(action.default) if isinstance(action.default, list) else action.default
        choices = f" ({' / '.join(action.choices)})" if action.choices else ""
        print(f"| `--{f.name}` | `{default}` | {f.metadata['help']}{choices} |")


if __name__ == "__main__":
    main()
