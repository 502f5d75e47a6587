"""Task plugins: prompt sources with a programmatic gold scorer and an expert that acts well from any state."""
