"""Studies over many runs: the ablations (ablate) and the paper's studies from shipped
configs (reproduce, with its report). Each trains through afmp.training and measures
through afmp.bench."""
