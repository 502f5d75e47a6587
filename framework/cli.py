"""The `rlhf` command: Hydra composes the config from conf/, then `pipeline.run` does the work.

Only Hydra is imported at module level so that `rlhf --help` and `rlhf --cfg job` answer at once; torch,
Lightning, transformers and MLflow are imported when a stage actually runs.
"""

from __future__ import annotations

import re
import sys

import hydra
from omegaconf import DictConfig
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from framework.errors import RLHFError

# conf/ ships in the wheel as the package `rlhf_conf` (see pyproject.toml), so this works installed or editable.
CONFIG_PATH = "pkg://rlhf_conf"


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def _hydra_entry(cfg: DictConfig) -> None:
    from framework.pipeline import run

    try:
        run(cfg)
    except RLHFError as err:
        if not err.echoed_by_rank:  # said once: rank 0 says what every process of a DDP run found together
            print(f"\nerror: {err}", file=sys.stderr)
        sys.exit(2)
    except MissingMandatoryValue as err:  # a `???` in conf/ that nobody filled in
        key = getattr(err, "full_key", None) or "a required value"
        print(f"\nerror: {key} is required and was not given: pass {key}=<value> on the command line", file=sys.stderr)
        sys.exit(2)
    except InterpolationToMissingValueError as err:  # the same, reached through another key (`policy.path` of
        # model=pretrained is `${model.path}`)
        found = re.search(r"Missing mandatory value: ([\w.\[\]-]+)", str(err))
        key, via = (found.group(1) if found else "a required value"), getattr(err, "full_key", None)
        print(f"\nerror: {key} is required and was not given" + (f" ({via} is taken from it)" if via else "")
              + f": pass {key}=<value> on the command line", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console-script entry point (`rlhf`, `python -m framework`). `rlhf chat ...` is the chat command,
    `rlhf compare ...` (also `rlhf-compare`) the comparison of runs."""
    if len(sys.argv) > 1 and sys.argv[1] == "chat":
        from framework.chat import main as chat_main

        sys.exit(chat_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "compare":
        from framework.compare import main as compare_main

        sys.exit(compare_main(sys.argv[2:]))
    _hydra_entry()


if __name__ == "__main__":
    main()
