"""rrstem: live 4D-STEM analysis beside the microscope.

Subpackages: ``rrstem.stream`` (protocol, receiver, maps, results, service,
CLI), ``rrstem.model`` (the rrVAE and its online trainer), ``rrstem.gui``
(the dashboard) and ``rrstem.simulators`` (synthetic scans and file replay).
"""

__version__ = "0.1.0"
