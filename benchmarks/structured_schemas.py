"""Twenty pydantic models for the structured-outputs checks: nested objects, arrays, enums, optional fields, bounded numbers.

Each comes with a prompt that asks for one, in plain words, as a user would.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal, Optional

from pydantic import BaseModel, Field


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    street: str
    city: str
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str
    age: int = Field(ge=0, le=120)
    email: Optional[str] = None


class PersonWithAddress(BaseModel):
    name: str
    address: Address


class Book(BaseModel):
    title: str
    author: str
    year: int = Field(ge=1400, le=2030)
    genres: list[str] = Field(max_length=4)


class Product(BaseModel):
    name: str
    price: float = Field(ge=0, le=10000)
    in_stock: bool
    color: Color


class Recipe(BaseModel):
    dish: str
    servings: int = Field(ge=1, le=12)
    ingredients: list[str] = Field(min_length=1, max_length=8)


class Weather(BaseModel):
    city: str
    temperature_c: float = Field(ge=-60, le=60)
    condition: Literal["sunny", "cloudy", "rainy", "snowy"]


class Point(BaseModel):
    x: float
    y: float


class Polygon(BaseModel):
    name: str
    points: list[Point] = Field(min_length=3, max_length=6)


class Task(BaseModel):
    title: str
    priority: Literal["low", "medium", "high"]
    done: bool
    due_day: Optional[int] = Field(default=None, ge=1, le=31)


class TodoList(BaseModel):
    owner: str
    tasks: list[Task] = Field(min_length=1, max_length=3)


class Movie(BaseModel):
    title: str
    rating: float = Field(ge=0, le=10)
    actors: list[str] = Field(max_length=3)


class Company(BaseModel):
    name: str
    employees: int = Field(ge=1, le=1_000_000)
    headquarters: Address
    public: bool


class Flight(BaseModel):
    origin: str = Field(pattern=r"^[A-Z]{3}$")
    destination: str = Field(pattern=r"^[A-Z]{3}$")
    seats: int = Field(ge=1, le=9)


class Sentiment(BaseModel):
    text: str
    label: Literal["positive", "negative", "neutral"]
    confidence: float = Field(ge=0, le=1)


class Invoice(BaseModel):
    number: int = Field(ge=1)
    items: list[Product] = Field(min_length=1, max_length=3)
    paid: bool


class Event(BaseModel):
    name: str
    month: int = Field(ge=1, le=12)
    day: int = Field(ge=1, le=31)
    attendees: Optional[list[Person]] = Field(default=None, max_length=3)


class Animal(BaseModel):
    species: str
    legs: int = Field(ge=0, le=8)
    can_fly: bool
    colors: list[Color] = Field(max_length=3)


class Quiz(BaseModel):
    question: str
    choices: list[str] = Field(min_length=2, max_length=4)
    answer_index: int = Field(ge=0, le=3)


class Country(BaseModel):
    name: str
    capital: str
    population_millions: float = Field(ge=0, le=2000)
    languages: list[str] = Field(min_length=1, max_length=3)


SCHEMAS: list[tuple[type[BaseModel], str]] = [
    (Person, "Describe a person named Ann, aged 34."),
    (PersonWithAddress, "Give the name and address of someone living in Paris."),
    (Book, "Describe a famous novel."),
    (Product, "Describe a product sold in a shop."),
    (Recipe, "Give a simple pancake recipe."),
    (Weather, "What is the weather like in London today?"),
    (Point, "Give a point on a plane."),
    (Polygon, "Describe a triangle."),
    (Task, "Describe a task on a to-do list."),
    (TodoList, "Write Bob's to-do list."),
    (Movie, "Describe a famous movie."),
    (Company, "Describe a company."),
    (Flight, "Describe a flight from Paris to New York."),
    (Sentiment, "Classify the sentiment of: 'I love this phone.'"),
    (Invoice, "Write an invoice for two items."),
    (Event, "Describe a birthday party."),
    (Animal, "Describe a cat."),
    (Quiz, "Write a quiz question about geography."),
    (Country, "Describe France."),
    (Address, "Give an address in Berlin."),
]
