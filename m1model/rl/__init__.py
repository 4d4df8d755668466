"""m1model.rl: RL on verifiable rewards for M1 (DESIGN 6), the parts that do not need the model.

losses      CISPO, GRPO, DAPO losses, group advantages, loss statistics (pure functions)
tasks       procedural tasks (addition, sorting, countdown), rewards, a character tokenizer
sandbox     sandboxed execution of Python-function answers as a reward
checkpoint  atomic files and checkpoints (safetensors + JSON, never pickle)
metrics     metrics.jsonl, Pearson correlation of rollout/training probabilities, plots
"""

from m1model.rl.checkpoint import Checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from m1model.rl.losses import (
    CISPO_EPS_HIGH,
    LossStats,
    cispo_loss,
    cispo_stats,
    dapo_loss,
    global_token_count,
    group_advantages,
    grpo_loss,
    ppo_clip_stats,
    zero_variance_groups,
)
from m1model.rl.metrics import MetricsWriter, pearson, plot_metrics, prob_corr, read_metrics
from m1model.rl.sandbox import FunctionProblem, PythonFunctionReward, SandboxLimits, run_function_tests
from m1model.rl.tasks import END, TASKS, AdditionTask, CharTokenizer, CountdownTask, SortingTask, Task, make_task

__all__ = [
    "CISPO_EPS_HIGH", "END", "TASKS", "AdditionTask", "CharTokenizer", "Checkpoint", "CountdownTask",
    "FunctionProblem", "LossStats", "MetricsWriter", "PythonFunctionReward", "SandboxLimits", "SortingTask", "Task",
    "cispo_loss", "cispo_stats", "dapo_loss", "global_token_count", "group_advantages", "grpo_loss",
    "load_checkpoint", "make_task", "pearson", "plot_metrics", "ppo_clip_stats", "prob_corr", "read_metrics",
    "rng_state", "run_function_tests", "save_checkpoint", "set_rng_state", "zero_variance_groups",
]
