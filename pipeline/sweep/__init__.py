"""`fss sweep`: ablation grids and tuning studies on Optuna.

Modules import one way: ``study`` (study files) <- ``queueing`` (a study in its storage)
<- ``run`` (trials) and ``report`` (tables, plots) <- ``cli`` (the typer sub-app);
``storage`` (where a study lives) and ``wandb_file`` (the W&B sweep file) sit beside them.
"""
