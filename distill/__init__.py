"""Distillation stage: stream cached teacher K/V, project them and train the student."""
