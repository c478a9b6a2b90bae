"""Healing after pruning: distill the pruned model toward the model as loaded (the teacher).

* ``loss``: the token-level top-k KL (teacher ‖ student) and the LM loss (pure functions);
* ``schedule``: learning-rate warm-up + cosine, the order of the training windows (pure);
* ``teacher``: the teacher's top-k log-probs on the heal windows, kept in a baseline-logits store
  (compress.evaluate.fidelity: one store module for fidelity and for healing);
* ``adapters``: which modules train (LoRA through peft, or full weights) and merging back;
* ``loop``: the training loop with atomic, resumable checkpoints;
* ``plot``: the loss curve in the run report.
"""
