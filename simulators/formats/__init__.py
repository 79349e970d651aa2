"""One reader per recorded 4D-STEM file format, each returning a ``Loaded`` (``common.py``).

``rrstem.simulators.files`` picks the reader by suffix (``OPENERS``) or by the
file's first bytes (``MAGIC``) and turns what it returns into a ``Source``.

- ``dectris``: DECTRIS ``*_master.h5`` with its ``*_data_*.h5`` files (flat series).
- ``empad``: EMPAD ``.raw`` + ``.xml`` (128x130 float32 frames, 2 metadata rows dropped).
- ``emd``: EMD 1.0 / py4DSTEM HDF5 (``emd_group_type`` array groups).
- ``hyperspy``: HyperSpy ``.hspy`` (HDF5) and ``.zspy`` (zarr).
- ``stempy``: NCEM 4D Camera electron-counted HDF5 (stempy's ``/electron_events``), events per frame made
  dense a chunk of positions at a time.
- ``dm``: Gatan DigitalMicrograph ``.dm3`` / ``.dm4`` (own tag-tree parser, memory-mapped data).
- ``mib``: Quantum Detectors Merlin ``.mib`` (with or without its ``.hdr``); it returns a ``Source``
  (``MibSource``) itself, since its frames are records with a header each, and ``open_file`` takes a
  ``.mib`` by suffix or by its first bytes (``is_mib``) before the other readers.
"""
