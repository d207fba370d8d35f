"""Evaluation: exact retrieval metrics and nearest neighbours, NMI of k-means, and figures."""

from mmsi_jax.eval import figures
from mmsi_jax.eval.clustering import kmeans, nmi, normalized_mutual_information
from mmsi_jax.eval.retrieval import nearest_neighbors, query_mesh, retrieval_metrics

__all__ = ["figures", "kmeans", "nearest_neighbors", "nmi", "normalized_mutual_information",
           "query_mesh", "retrieval_metrics"]
