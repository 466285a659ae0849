// A free TCP port on 127.0.0.1 for a peer the test starts (mosquitto, a relay child).
//
// Why not simply the kernel's pick from listen(0): that comes from the ephemeral range, the
// same range outgoing connections take their local port from, so between "found free" and the
// child's bind a test's own MQTT client may sit on it (EADDRINUSE). A random port below the
// ephemeral range, checked by listening on it, does not race our own clients. Never 1883:
// another broker may own it on a developer's machine.
import { readFileSync } from 'node:fs';
import { createServer } from 'node:net';

const FLOOR = 10_000;

function ephemeralLow(): number {
  try {
    const low = Number(readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]);
    return Number.isInteger(low) && low > 0 ? low : 32_768;
  } catch {
    return 49_152; // IANA's dynamic range, used by macOS and Windows
  }
}

/** Resolves with the port once something could listen on it (and has stopped again), or 0. */
function tryListen(port: number): Promise<number> {
  return new Promise((resolve) => {
    const server = createServer();
    server.unref();
    server.once('error', () => resolve(0));
    server.listen({ port, host: '127.0.0.1', exclusive: true }, () => {
      const address = server.address();
      const got = typeof address === 'object' && address ? address.port : 0;
      server.close(() => resolve(got));
    });
  });
}

export async function freePort(): Promise<number> {
  const high = ephemeralLow() - 1;
  if (high - FLOOR >= 1000) {
    for (let i = 0; i < 50; i++) {
      const candidate = FLOOR + Math.floor(Math.random() * (high - FLOOR));
      if (await tryListen(candidate)) return candidate;
    }
  }
  const port = await tryListen(0);
  if (!port) throw new Error('could not find a free port on 127.0.0.1');
  return port;
}
