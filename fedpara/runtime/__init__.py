"""The shared runtime: what the coordinator and the edge client both need, beyond the method.

    messages   the application protocol: typed task / update / status / control (ProtocolError)
    topics     MQTT topic layout and id rules
    mqtt       one MQTT session (paho), broker URLs
    netstats   kernel TCP byte counters of a socket
    rundir     run directory and client state directory layout
    checkpoint safetensors checkpoints of factor states
    options    typed config fields, validators, TOML loading
    flags      command-line flags generated from the config dataclasses
    cli        the ``fedpara`` console script (commands are plugins)

The method library (``import fedpara``) never imports this package; this package imports the
method and the wire format. Nothing is imported here eagerly: ``import fedpara.runtime.mqtt``
loads paho, ``import fedpara.runtime.rundir`` does not.
"""
