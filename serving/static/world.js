// A small offline world map: equirectangular graticule and coarse continent outlines
// (a few dozen [lon, lat] points each -- enough to find a place, not a survey).
"use strict";
const CONTINENTS = [
  // North America
  [[-168,66],[-162,70],[-140,70],[-125,70],[-95,72],[-80,73],[-65,60],[-55,52],[-66,45],[-75,38],[-81,31],[-80,25],[-84,30],[-90,29],[-97,27],[-97,21],[-88,21],[-87,15],[-83,9],[-78,8],[-84,12],[-92,15],[-105,20],[-112,29],[-117,33],[-124,40],[-124,48],[-133,56],[-150,60],[-165,60],[-168,66]],
  // Greenland
  [[-73,78],[-60,82],[-30,83],[-20,75],[-40,65],[-50,61],[-55,68],[-73,78]],
  // South America
  [[-78,8],[-72,12],[-62,10],[-50,0],[-35,-6],[-39,-15],[-48,-26],[-58,-35],[-65,-42],[-69,-52],[-74,-52],[-73,-40],[-71,-30],[-70,-18],[-76,-14],[-81,-5],[-80,0],[-78,8]],
  // Europe and Asia
  [[-10,36],[-9,43],[-2,44],[-5,48],[2,51],[8,54],[10,58],[5,62],[15,69],[28,71],[40,67],[60,70],[80,73],[105,78],[140,72],[170,70],[180,66],[170,60],[160,55],[143,50],[140,40],[130,35],[121,30],[121,22],[108,20],[106,10],[100,13],[100,4],[104,1],[98,8],[92,22],[80,15],[77,8],[72,20],[66,25],[57,25],[50,30],[48,29],[56,24],[52,16],[43,13],[35,28],[33,31],[36,36],[27,37],[26,41],[22,37],[18,40],[12,44],[15,38],[8,44],[3,43],[-5,36],[-10,36]],
  // Africa
  [[-17,15],[-17,21],[-10,30],[-6,36],[10,37],[11,33],[20,31],[32,31],[35,28],[43,12],[51,12],[40,-3],[40,-15],[35,-24],[27,-34],[18,-34],[12,-18],[13,-6],[9,4],[-4,5],[-13,8],[-17,15]],
  // Arabia/Madagascar-ish detail omitted; Australia
  [[114,-22],[122,-18],[131,-12],[137,-12],[142,-11],[146,-19],[153,-26],[150,-37],[144,-38],[138,-35],[131,-31],[115,-34],[114,-22]],
  // New Zealand
  [[172,-35],[178,-38],[174,-41],[168,-46],[172,-42],[172,-35]],
  // Britain
  [[-5,50],[1,51],[0,53],[-3,58],[-6,57],[-3,54],[-5,50]],
  // Japan
  [[130,31],[135,34],[140,35],[142,40],[141,45],[139,40],[135,35],[130,33],[130,31]],
  // Indonesia (Borneo, Sumatra) and Madagascar
  [[109,1],[117,7],[119,1],[116,-4],[110,-3],[109,1]],
  [[95,5],[106,-6],[103,-5],[95,5]],
  [[44,-25],[50,-15],[49,-12],[43,-17],[44,-25]],
  // Antarctica (coarse band)
  [[-180,-78],[-120,-74],[-60,-64],[0,-70],[60,-67],[120,-66],[180,-78],[180,-90],[-180,-90]],
];

function drawWorld(canvas, marker) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height;
  const x = lon => (lon + 180) / 360 * W, y = lat => (90 - lat) / 180 * H;
  ctx.fillStyle = "#e8f1fb"; ctx.fillRect(0, 0, W, H);
  ctx.strokeStyle = "#c4d3e6"; ctx.lineWidth = 1;
  for (let lon = -180; lon <= 180; lon += 30) { ctx.beginPath(); ctx.moveTo(x(lon), 0); ctx.lineTo(x(lon), H); ctx.stroke(); }
  for (let lat = -90; lat <= 90; lat += 30) { ctx.beginPath(); ctx.moveTo(0, y(lat)); ctx.lineTo(W, y(lat)); ctx.stroke(); }
  ctx.strokeStyle = "#8aa"; ctx.beginPath(); ctx.moveTo(0, y(0)); ctx.lineTo(W, y(0)); ctx.stroke();
  ctx.fillStyle = "#cfe3c0"; ctx.strokeStyle = "#6b8f5a";
  for (const poly of CONTINENTS) {
    ctx.beginPath();
    poly.forEach(([lo, la], i) => i ? ctx.lineTo(x(lo), y(la)) : ctx.moveTo(x(lo), y(la)));
    ctx.closePath(); ctx.fill(); ctx.stroke();
  }
  if (marker && marker.lat !== null && marker.lon !== null) {
    ctx.fillStyle = "#d22"; ctx.beginPath(); ctx.arc(x(marker.lon), y(marker.lat), 5, 0, 2 * Math.PI); ctx.fill();
  }
}

// canvas click -> {lat, lon}, rounded to 0.01 degree
function mapToPlace(canvas, ev) {
  const r = canvas.getBoundingClientRect();
  const fx = (ev.clientX - r.left) / r.width, fy = (ev.clientY - r.top) / r.height;
  const round = v => Math.round(v * 100) / 100;
  return { lat: round(Math.max(-90, Math.min(90, 90 - fy * 180))), lon: round(Math.max(-180, Math.min(180, fx * 360 - 180))) };
}
