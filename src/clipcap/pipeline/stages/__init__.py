"""One module per DVC stage, each with ``run(cfg, layout)``: what ``clipcap <stage>`` runs."""
