"""Embedded default data: seeded synthetic datasets in the real ImageFolder / Pascal VOC / ADE20K formats.

- ``datakit.render``: the shared shape x texture vocabulary and the scene renderer (numpy only).
- ``datakit.make``: writers for the three on-disk formats; ``main(argv)`` is ``tools/make_data.py``.
- ``datakit.check``: validators for real or generated trees; ``datakit.check_cli.main(argv)`` is
  ``tools/check_data.py``.
- ``datakit.check_cache``: a tree's pass remembered by its manifest, so an unchanged tree is not checked again.
"""
