"""Command-line tools registered in ``qkv.cli.COMMANDS``: each module has ``add_arguments(parser)``
and ``run(args)``. memory (KV arithmetic), convert (MHA -> GQA/MQA), perplexity, bench."""
