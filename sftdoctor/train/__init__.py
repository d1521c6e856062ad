"""`sftdoctor train`: a readable SFT recipe on HF Trainer, gated by the probes.

    recipe.py     one dataclass with every default; CLI flags and --config files map onto it
    data.py       GSM8K (Hub or local) and synthetic GSM8K-format problems
    collate.py    rows -> supervised token rows -> right-padded batches; length-grouped sampler
    pipeline.py   tokenizer, model, tokenized rows, collator, dtype: built once from the recipe
    preflight.py  the probes on the first real batches; --fix remedies, printed before -> after
    trainer.py    the HF Trainer run: checkpoints, resume, save; the whole run in `run()`
    steplog.py    steps.jsonl (example ids per step), tokens/s, MFU, the non-finite-loss guard
    checks.py     reload the saved model and check it (finite weights, generation stops)
    evaluate.py   greedy left-padded generation, exact match after `####`
"""
from .recipe import Recipe, build_recipe  # noqa: F401
