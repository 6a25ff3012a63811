"""Model building blocks shared by the model definitions: rotary embedding, RMSNorm, embeddings."""
