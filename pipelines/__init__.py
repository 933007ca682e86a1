"""The CRRG-CLIP model stack: preprocessing, models, model bundles, the inference engine, phantoms,
training and evaluation. Knows nothing of networking or the database."""
