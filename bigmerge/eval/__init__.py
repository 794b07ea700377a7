"""Evaluation with lm-eval: the zoo's tasks, checkpoints on disk and in-memory models.

    from bigmerge.eval import evaluate, Evaluator
    table = evaluate(["./merged", "./zoo/add"], tasks="zoo", limit=200)   # -> Table
    print(table.to_text()); table.write("out/")                           # eval.json, .md, .png

    with Evaluator("zoo", limit=100) as ev:                                # a search's fitness
        scores = ev.score("candidate", model, tokenizer)                   # {task: score}

Importing this package is cheap: lm-eval, torch and transformers load on first use.
"""

from bigmerge.eval.harness import ZOO_TASKS, Evaluator, evaluate, load_model, resolve_tasks, write_zoo_tasks
from bigmerge.eval.table import Table

__all__ = ["ZOO_TASKS", "Evaluator", "Table", "evaluate", "load_model", "resolve_tasks", "write_zoo_tasks"]
