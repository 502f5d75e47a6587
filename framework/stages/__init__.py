"""The recipe's stages, each a LightningModule (+ DataModule) and a `Stage` that wires plugins, trains and exports."""
