"""The operations layer: tooling that runs, configures or installs the services.

The code is layered, and dependencies point one way, downwards:

1. the core (``devft_edge`` outside ``ops`` and ``cli``): the method, packs, the protocol, MQTT;
2. the services built on it (``cloud_aggregator``, ``device_agent``);
3. operations, above both: this package and the ``devft-edge`` command line (:mod:`devft_edge.cli`).

Modules here may import the services; the core and the services never import this package, so a
service can be deployed, and the core tested, without the operator's tooling
(``tests/test_import_direction.py`` enforces it).

- :mod:`~devft_edge.ops.demo`: the demo fleet, broker, aggregator and agents as processes here;
- :mod:`~devft_edge.ops.broker`: the embedded amqtt broker in a child process;
- :mod:`~devft_edge.ops.broker_config`, :mod:`~devft_edge.ops.certificates`: a fleet's mosquitto
  config, its passwords, ACL, CA and certificates;
- :mod:`~devft_edge.ops.bundle`: offline install bundles of the agent;
- :mod:`~devft_edge.ops.flash`: installing bundles on devices over SSH, with a health check.
"""
