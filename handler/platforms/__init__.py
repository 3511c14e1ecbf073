"""Adapters for serverless GPU platforms (RunPod; Modal lives in infra/modal/app.py)."""
