// The ceiling: the least an HTTP server on node:http can do per push (read the whole body,
// answer {"status":"OK"}), with no parsing, validation or MQTT. Usage: node ceiling.mjs HOST PORT
import { createServer } from 'node:http';

const [host = '127.0.0.1', port = '0'] = process.argv.slice(2);
const OK = Buffer.from('{"status":"OK"}');

const server = createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    void Buffer.concat(chunks);
    res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': OK.length });
    res.end(OK);
  });
});
// As the relay does: Mattermost keeps idle connections for 90 s.
server.keepAliveTimeout = 95_000;
server.listen(Number(port), host);
process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));
