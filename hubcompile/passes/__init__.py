"""Graph passes: what hubcompile does to a graph, in the order pipeline.py lists."""
