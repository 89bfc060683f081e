"""The names of the files a run directory holds: the one place they are spelled.

The run directory (:mod:`finetune.rundir`), the loop, the reports, the hooks and the exports take a run's file
names from here; ``tests/test_layout.py`` checks that no other module spells one.
"""

RECIPE = "recipe.toml"  # the resolved recipe
CLASSES = "classes.json"  # the class list, in model output order
BEST = "best.pt"  # the checkpoint selected on val
LAST = "last.pt"  # the latest epoch's checkpoint (resume)
METRICS = "metrics.jsonl"  # one line per epoch
METRICS_CSV = "metrics.csv"
BAD_IMAGES = "bad_images.json"  # images that could not be read, skipped
REPORT = "report.json"  # the final numbers per split
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
THRESHOLDS = "thresholds.json"  # the calibrated decision thresholds
THRESHOLDS_PREV = "thresholds.prev.json"  # the thresholds a re-calibration replaced
THRESHOLDS_RUN = "thresholds.run.json"  # the training run's own thresholds, never replaced
PROBABILITIES = "probabilities.json"  # the fitted probability calibration (temperature)
PROBABILITIES_PREV = "probabilities.prev.json"
PROBE = "probe.safetensors"  # the linear probe's classifier
LABEL_ISSUES = "label_issues.csv"
REJECT = "reject.json"  # the single-label reject option
REJECT_PREV = "reject.prev.json"
LOCK = ".lock"  # the run-directory lock
CURVES = "curves.png"
PR_CURVES = "pr_curves.png"
RELIABILITY = "reliability.png"
RELIABILITY_PREV = "reliability.prev.png"
F1_BARS = "f1_per_class.png"
CONFUSION = "confusion_matrix.png"
COVERAGE = "coverage_accuracy.png"
COVERAGE_PREV = "coverage_accuracy.prev.png"
TORCHRUN_ID = "torchrun_id"  # the elastic job a run belongs to
WANDB_ID = "wandb_id.txt"
BENCHMARK = "benchmark.json"  # finetune benchmark's table
BENCHMARK_PLOT = "benchmark.png"  # its quality-against-latency plot
BENCHMARK_DIR = "benchmark_models"  # the models it exported and timed
# A folder timm and the Hugging Face Hub read (finetune export --format hf): timm's own file names.
HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"


def eval_report(split: str) -> str:
    """The file ``finetune eval --split SPLIT`` writes."""
    return f"eval_{split}.json"
