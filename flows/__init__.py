"""trtflow's Prefect flows and CLI: they compose the stages in tasks/ and hold no stage logic."""
