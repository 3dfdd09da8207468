"""Lightning callbacks (installed as ``lightning_peft.callbacks``)."""
