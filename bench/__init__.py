"""jattn's benchmark suite: `python -m bench` measures, `python -m bench report` reports.

Measurements are records (JSON lines, see `bench.records.Record`); tables and plots are made
from records only, so files from different machines can be reported side by side.
"""

from bench.records import Record, attention_flops, read_records
from bench.report import markdown_report, plot, write_report
from bench.shapes import SHAPE_SETS, Shape
from bench.sweep import SweepConfig, run_sweep
from bench.timing import TimingConfig

__all__ = [
    "SHAPE_SETS",
    "Record",
    "Shape",
    "SweepConfig",
    "TimingConfig",
    "attention_flops",
    "markdown_report",
    "plot",
    "read_records",
    "run_sweep",
    "write_report",
]
