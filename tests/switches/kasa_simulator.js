// Starts one TP-Link plug of the npm package tplink-smarthome-simulator on 127.0.0.1 and prints
// {"port": N} once it listens. Used by tests/switches/conftest.py; model from argv[2] (default hs110,
// the plug with an energy meter). Stops on SIGTERM.
'use strict';
const { Device } = require('tplink-smarthome-simulator');

const model = process.argv[2] || 'hs110';
const device = new Device({
  port: 0,
  address: '127.0.0.1',
  model,
  data: { alias: 'Rack plug', mac: '50:c7:bf:0d:91:8c', deviceId: '8006A1B2C3D4E5F60718293A4B5C6D7E8F901234' },
});
device.start().then(() => {
  process.stdout.write(JSON.stringify({ port: device.port }) + '\n');
});
process.on('SIGTERM', () => device.stop().then(() => process.exit(0)));
