"""Ray job entrypoints: `python -m jobs.<name> --config cfg.json`, submitted by `pipeline.submit`.

Each module defines `run(cfg: dict)` and ends with `common.main(run)`; `jobs.common` parses
the arguments, loads the config and turns errors into exit codes.
"""
