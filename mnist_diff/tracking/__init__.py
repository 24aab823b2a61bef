"""MLflow tracking: runs written and read back (`mlflow_store`) and the trained model logged, registered and
loaded by URI (`mlflow_model`), the only modules that import mlflow; the training callback, figures."""
