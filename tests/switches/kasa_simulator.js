// Starts one TP-Link plug of the npm package tplink-smarthome-simulator and prints {"port": N} once it
// listens. Used by tests/switches/conftest.py and the lab recovery test (tests/e2e/test_recover_lab.py).
//
//   node kasa_simulator.js [MODEL] [--address IP] [--port N] [--on] [--relay-events]
//
// MODEL defaults to hs110 (the plug with an energy meter), IP to 127.0.0.1 (the lab test runs it in a lab
// namespace on the lab's address), N to 0 (a free port). --on: the relay starts on (the simulator's default is
// off), as the plug of a node that runs. --relay-events: print {"relay": 0|1} on stdout
// every time a command changes the relay, so a watcher can cut or restore the power of what the plug feeds.
// Stops on SIGTERM.
'use strict';
const { Device } = require('tplink-smarthome-simulator');

const args = process.argv.slice(2);
const option = (name, fallback) => {
  const i = args.indexOf(name);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : fallback;
};
const model = args[0] && !args[0].startsWith('--') ? args[0] : 'hs110';
const device = new Device({
  port: Number(option('--port', '0')),
  address: option('--address', '127.0.0.1'),
  model,
  data: { alias: 'Rack plug', mac: '50:c7:bf:0d:91:8c', deviceId: '8006A1B2C3D4E5F60718293A4B5C6D7E8F901234' },
});

if (args.includes('--on')) {
  device.data.system.sysinfo.relay_state = 1;
}
if (args.includes('--relay-events')) {
  let relay = device.data.system.sysinfo.relay_state;
  // 'response' is emitted after a command was applied and answered: the relay state is the new one
  device.deviceNetworking.on('response', () => {
    const now = device.data.system.sysinfo.relay_state;
    if (now !== relay) {
      relay = now;
      process.stdout.write(JSON.stringify({ relay: now }) + '\n');
    }
  });
}

device.start().then(() => {
  process.stdout.write(JSON.stringify({ port: device.port, relay: device.data.system.sysinfo.relay_state }) + '\n');
});
process.on('SIGTERM', () => device.stop().then(() => process.exit(0)));
