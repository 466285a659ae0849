// The naive relay: what a user would write in twenty lines instead of push-relay. node:http,
// one mqtt.js connection with its defaults, the message text published at QoS 1 to mm/_notif,
// {"status":"OK"} once the broker has acknowledged it; no validation, no dedup, no outbox, no
// metrics. Only the arguments and the GET /_published counter (read by bench/throughput.mjs
// between rounds, as for seed.py) are additions. Usage: node naive.mjs HOST PORT BROKER_PORT
import { createServer } from 'node:http';
import mqtt from 'mqtt';

const [host = '127.0.0.1', port = '8066', brokerPort = '1883'] = process.argv.slice(2);
const client = mqtt.connect(`mqtt://127.0.0.1:${brokerPort}`);
let published = 0;

createServer((req, res) => {
  if (req.url === '/_published') return res.end(JSON.stringify({ published, connected: client.connected }));
  let body = '';
  req.on('data', (chunk) => (body += chunk));
  req.on('end', () => {
    const { message } = JSON.parse(body);
    client.publish('mm/_notif', message, { qos: 1 }, (err) => {
      if (err) return res.writeHead(500).end(JSON.stringify({ status: 'FAIL', error: err.message }));
      published++;
      res.writeHead(200, { 'Content-Type': 'application/json' }).end('{"status":"OK"}');
    });
  });
}).listen(Number(port), host);
process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));
