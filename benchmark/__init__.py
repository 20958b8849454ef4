"""dfkd-bench harness: CLI, data, model zoo, teachers, runner, tracking, tuning, plots, tables."""
