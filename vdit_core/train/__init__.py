"""Finetuning: ``python -m vdit_core.train`` (see :mod:`.trainer`)."""
