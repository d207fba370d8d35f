"""Evaluation: exact retrieval metrics and nearest neighbours, NMI of k-means, and figures."""

from mmsi_jax.eval.clustering import kmeans, nmi, normalized_mutual_information
from mmsi_jax.eval.retrieval import eval_mesh, nearest_neighbors, retrieval_metrics

__all__ = ["eval_mesh", "kmeans", "nearest_neighbors", "nmi", "normalized_mutual_information",
           "retrieval_metrics"]
