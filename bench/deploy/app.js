// Node app of the deploy benchmark: the same ~50 ms handler as app.py, answering with its
// release (the RELEASE file beside this file, symlinks resolved).
// APP_STARTUP_DELAY (seconds, default 0): time before it listens, i.e. becomes ready.
// APP_HANDLER_DELAY (seconds, default 0.05): the handler's delay.
// Listening: the socket-activation protocol when LISTEN_FDS is set for this pid (fd 3),
// else PORT on HOST (pm2 cluster mode shares that through its master).
// Readiness: process.send('ready') when under a parent with IPC (pm2); under Hatchery the site
// uses ready.check = "tcp" (ready once a worker accepts the agent's probe connection).
'use strict';
const http = require('http');
const fs = require('fs');
const path = require('path');

const here = path.dirname(fs.realpathSync(__filename));
let release;
try { release = fs.readFileSync(path.join(here, 'RELEASE'), 'utf8').trim(); } catch (e) { release = path.basename(here); }
const generation = process.env.HATCHERY_GENERATION || '-';
const delayMs = Number(process.env.APP_HANDLER_DELAY || '0.05') * 1000;
const startupMs = Number(process.env.APP_STARTUP_DELAY || '0') * 1000;

const server = http.createServer((req, res) => {
  setTimeout(() => {
    const body = `release ${release} generation ${generation} pid ${process.pid}\n`;
    res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body) });
    res.end(body);
  }, delayMs);
});

function ready() {
  if (process.send) process.send('ready');
}

function listen() {
  if (process.env.LISTEN_FDS && Number(process.env.LISTEN_PID) === process.pid) {
    server.listen({ fd: 3 }, ready);
  } else {
    server.listen(Number(process.env.PORT || 8000), process.env.HOST || '127.0.0.1', ready);
  }
}

let stopping = false;
function stop() {
  if (stopping) return;
  stopping = true;
  // Stop accepting, finish in-flight requests, then exit.
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 10000).unref();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
process.on('message', (m) => { if (m === 'shutdown') stop(); });

setTimeout(listen, startupMs);
