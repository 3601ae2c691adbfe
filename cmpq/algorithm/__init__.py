"""The CMPQ algorithm on one weight matrix: precision allocation, 1-D k-means, outlier selection."""
