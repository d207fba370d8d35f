from mmsi_jax.eval.retrieval import retrieval_metrics

__all__ = ["retrieval_metrics"]
