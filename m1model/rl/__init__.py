"""m1model.rl: RL on verifiable rewards for M1 (DESIGN 6).

losses      CISPO, GRPO, DAPO losses and group advantages (pure functions)
tasks       procedural tasks (addition, sorting, countdown), rewards, a character tokenizer
sandbox     sandboxed execution of Python answers as a reward
checkpoint  atomic files and checkpoints (safetensors + JSON, never pickle)
metrics     metrics.jsonl, Pearson correlation, reward/accuracy plots
"""
