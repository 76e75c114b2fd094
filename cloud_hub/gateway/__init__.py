"""The hub's MQTT side: escalations in, answers out, device status into the fleet table."""

from cloud_hub.gateway.activity import DeviceActivity
from cloud_hub.gateway.mqtt_gateway import MqttGateway

__all__ = ["DeviceActivity", "MqttGateway"]
