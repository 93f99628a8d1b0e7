"""Where the model runs: the device mesh and logical-axis rules (`sharding`), multi-host start-up
(`distributed`), the one checkpoint format (`checkpoint`) and what results record of the machine
(`hostinfo`)."""
