"""Command-line entry points: ``train``, ``evaluate``, ``score``, ``serve``, ``launch``, and what they share
(:mod:`coati.cli.options`). Library modules never import from here."""
