"""MLflow tracking: runs written and read back (`mlflow_store`, the only mlflow import), the training
callback, figures."""
