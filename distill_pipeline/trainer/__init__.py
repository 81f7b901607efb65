"""A standalone LoRA trainer for student models: a TrainSpec goes in, a PEFT adapter comes out.

It imports only torch, transformers, peft, datasets and safetensors (and dagster-pipes when that is
installed), never Dagster or the rest of distill_pipeline, so the same code runs on a laptop, a GPU
box or in a CUDA container. Entry points: ``python -m distill_pipeline.trainer.train --spec
spec.json`` (``train.train``) and ``predict.load_student``.
"""
