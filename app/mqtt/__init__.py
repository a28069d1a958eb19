"""MQTT for smart homes: chunks in over a broker, activity and transitions out, announced to Home Assistant."""
