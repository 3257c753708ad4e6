"""cifar10-deepspeed: the trainer behind cifar10_deepspeed.py (config, data, engine, loop, reporting)."""
