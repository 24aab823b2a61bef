"""The study: an Optuna grid over configs, run by worker processes, each trial tracked in MLflow. The only
subpackage that imports optuna."""
