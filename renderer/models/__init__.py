"""Model loading: built-in models and SDXL checkpoints in every common form."""

from renderer.models.loading import load_pipeline, model_geometry, recommended_restart_fraction, save_single_file

__all__ = ["load_pipeline", "model_geometry", "recommended_restart_fraction", "save_single_file"]
