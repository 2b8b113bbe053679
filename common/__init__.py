"""Pieces every package shares and none owns: the typed config, the CLI wrapper, atomic writes, front math,
objectives, the sweep's on-disk layout. It imports no other package of this project, so imports run one way."""
